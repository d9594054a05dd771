"""Input pipeline throughput: our tokenize + pack next to the LLaMA-E authors' alpaca-lora preprocessing.

    python -m bench.pipeline_cpu              # prints one JSON object

What is measured:

* **Data**: every shipped seed record (data_prep/seeds/*.jsonl) repeated `copies` times, SmolLM2's
  tokenizer (the default model's), sequence length 2048, batch 8.
* **Ours** (`llama_e_jax.data.pipeline`): `tokenize_split` (Alpaca template, prompt and response
  encoded with the Rust tokenizer's batch call, BOS/EOS, truncation) and then one shuffled epoch
  of packed batches (first-fit packing plan + `assemble_batch`: tokens, targets, loss mask, segment
  ids, positions). Tokens are the kept example tokens.
* **Alternative**: what alpaca-lora's `finetune.py` (which LLaMA-E was trained with) does per
  example through transformers' fast tokenizer: tokenize the full prompt + response, append EOS,
  tokenize the prompt again to mask its labels, then pad each batch of 8 to its longest example
  (no packing). Same template, same texts.
* **Per core**: tokens/s divided by the CPU cores this process may use (the Rust tokenizer's batch
  call is multi-threaded; the per-example alternative is not). The machine is shared, so treat
  single runs as indicative.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SEQ_LEN = 2048
BATCH_SIZE = 8


def seed_records(copies: int) -> list:
    from llama_e_jax.data.schema import read_jsonl

    records = [r for path in sorted(glob.glob(str(REPO_ROOT / "data_prep" / "seeds" / "*.jsonl")))
               for r in read_jsonl(path)]
    if not records:
        raise FileNotFoundError("no seed records under data_prep/seeds")
    return records * copies


def measure_ours(records: list, tokenizer: Any) -> dict[str, Any]:
    """tokenize_split + one shuffled epoch of packed batches."""
    import numpy as np

    from llama_e_jax.data import pipeline

    started = time.perf_counter()
    split = pipeline.tokenize_split(records, tokenizer, SEQ_LEN)
    tokenize_s = time.perf_counter() - started
    config = pipeline.PipelineConfig(seq_len=SEQ_LEN, batch_size=BATCH_SIZE, shuffle=True, num_epochs=1)
    started = time.perf_counter()
    batches = list(pipeline.make_train_iterator(split, None, config, process_index=0, process_count=1))
    pack_s = time.perf_counter() - started
    tokens = int(split.stats.tokens)
    return {
        "tokens": tokens,
        "tokenize_s": tokenize_s,
        "pack_s": pack_s,
        "tokens_per_s": tokens / (tokenize_s + pack_s),
        "tokenize_tokens_per_s": tokens / tokenize_s,
        "pack_tokens_per_s": tokens / pack_s,
        "batches": len(batches),
        "packing_efficiency": float(np.mean([pipeline.packing_efficiency(b) for b in batches])),
    }


def measure_alpaca_lora(records: list, hf_tokenizer: Any) -> dict[str, Any]:
    """alpaca-lora's generate_and_tokenize_prompt per example, then pad-to-longest batches of 8."""
    import numpy as np

    from llama_e_jax.data.prompt import build_prompt

    eos = hf_tokenizer.eos_token_id
    started = time.perf_counter()
    examples = []
    for record in records:
        prompt = build_prompt(record.instruction, record.input)
        full = hf_tokenizer(prompt + record.output, truncation=True, max_length=SEQ_LEN, padding=False)["input_ids"]
        if len(full) < SEQ_LEN:
            full = full + [eos]
        prompt_len = len(hf_tokenizer(prompt, truncation=True, max_length=SEQ_LEN, padding=False)["input_ids"])
        examples.append((full, [-100] * prompt_len + full[prompt_len:]))
    tokenize_s = time.perf_counter() - started
    started = time.perf_counter()
    padded_slots = 0
    for start in range(0, len(examples), BATCH_SIZE):
        chunk = examples[start:start + BATCH_SIZE]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = np.full((len(chunk), width), eos, np.int64)
        labels = np.full((len(chunk), width), -100, np.int64)
        for row, (ids, row_labels) in enumerate(chunk):
            input_ids[row, :len(ids)] = ids
            labels[row, :len(row_labels)] = row_labels
        padded_slots += input_ids.size
    pad_s = time.perf_counter() - started
    tokens = sum(len(ids) for ids, _ in examples)
    return {
        "tokens": tokens,
        "tokenize_s": tokenize_s,
        "pack_s": pad_s,
        "tokens_per_s": tokens / (tokenize_s + pad_s),
        "packing_efficiency": tokens / padded_slots,
    }


def run(copies: int = 10) -> dict[str, Any]:
    """Both measurements on the same records; returns a JSON-able dict (see the module docstring)."""
    from llama_e_jax.io.default_model import ensure_default_gguf, ensure_default_hf_dir
    from llama_e_jax.io.tokenizer import load_tokenizer

    records = seed_records(copies)
    tokenizer = load_tokenizer(ensure_default_gguf())
    ours = measure_ours(records, tokenizer)

    import transformers

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(ensure_default_hf_dir()))
    alternative = measure_alpaca_lora(records, hf_tokenizer)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    for result in (ours, alternative):
        result["tokens_per_s_per_core"] = result["tokens_per_s"] / cores
    return {
        "benchmark": "input_pipeline",
        "records": len(records),
        "seq_len": SEQ_LEN,
        "batch_size": BATCH_SIZE,
        "cores": cores,
        "ours": ours,
        "alternative": {"name": "alpaca-lora preprocessing (transformers fast tokenizer, pad to longest)",
                        **alternative},
        "speedup": ours["tokens_per_s"] / alternative["tokens_per_s"],
        "rows": [  # what bench/run_all.py prints
            {"metric": "tokenize+pack tokens/s", "ours": ours["tokens_per_s"],
             "alternative": alternative["tokens_per_s"], "ratio": ours["tokens_per_s"] / alternative["tokens_per_s"]},
            {"metric": "tokens/s per core", "ours": ours["tokens_per_s_per_core"],
             "alternative": alternative["tokens_per_s_per_core"],
             "ratio": ours["tokens_per_s_per_core"] / alternative["tokens_per_s_per_core"]},
            {"metric": "tokens / batch slots (packing)", "ours": ours["packing_efficiency"],
             "alternative": alternative["packing_efficiency"],
             "ratio": ours["packing_efficiency"] / alternative["packing_efficiency"]},
        ],
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
