"""Speculative (prompt-lookup) decoding on this CPU, on real prompts, next to transformers in one run.

    python bench/decode_speculative.py                      # markdown table
    python bench/decode_speculative.py --limit-per-task 2 --new-tokens 32 --ks 1,2,4

Workload: SmolLM2-135M-Instruct fp32 (the embedded default model), the real test-split records of
all five tasks (`test_records`: the seed test split and, when imported, the imported test files;
each task's first `limit_per_task`), Alpaca prompts, greedy, up to `new_tokens` per row, stopping at
EOS on every side. Decoders, all in this one process:

* ours, plain: `Generator(speculation=speculative.OFF)`;
* ours, speculative, one per k in `--ks`: prompt-lookup drafts (3..1-gram matches), speculation on
  at every batch size measured (max_rows 16), so the batch-16 figure shows what it does there;
* transformers `generate` (greedy);
* transformers `generate(prompt_lookup_num_tokens=K)` (its own prompt-lookup speculation; transformers
  supports it at batch 1 only, so it has no batch-16 figure).

Batch 1: each prompt alone; batch 16: all prompts in one `generate` call (ours: continuous batching
over 16 rows; transformers: left-padded groups of 16, its tokens counted up to each row's EOS).
Tokens/s = generated tokens / wall time, and also / CPU time of this process (`time.process_time`,
all threads): on a shared machine other processes inflate wall time far more than CPU time, so
the CPU-time ratios are the steadier ones. Compilation is excluded (ours runs every call once
before timing), and the decoders alternate over `repeats` rounds (best round kept), so they see
the same machine load. Outputs: every speculative run must equal plain greedy's tokens (asserted);
rows where transformers' tokens differ (floating-point near-ties) are counted. Acceptance length
per task = tokens emitted per verify step, replayed on the host from the greedy output
(`speculative.acceptance_lengths`, exact for greedy decoding). The 1-minute load average is
recorded before and after.
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.decode_cpu import REPO_ROOT, report  # noqa: E402 (its import sets XLA_FLAGS for XNNPACK before JAX starts)

HF_PROMPT_LOOKUP = 10  # transformers' documented example value for prompt_lookup_num_tokens


def test_records(limit_per_task: int | None, imported: bool = True) -> list[Any]:
    """The real test-split records of all five tasks, task by task (each task's first `limit_per_task`).

    Sources: the seed test split (data_prep/seeds, split by id hash as llama_e_jax.data assigns it)
    and, when `python -m data_prep.importers` has run, the imported test files
    ($LLAMA_E_CACHE/imported/*/test.jsonl: product Q&A, intents, ads). Within a task the sources are
    interleaved (seed, then each imported file in turn), so a limit keeps every source represented.
    """
    from llama_e_jax.data.schema import TASKS, read_jsonl
    from llama_e_jax.data.tfds_builder import assign_splits, default_imported_dir

    files = sorted(glob.glob(str(Path(REPO_ROOT) / "data_prep" / "seeds" / "*.jsonl")))
    sources = [assign_splits([r for f in files for r in read_jsonl(f)])["test"]]
    if imported:
        sources += [read_jsonl(f) for f in sorted(glob.glob(os.path.join(default_imported_dir(), "*", "test.jsonl")))]
    by_task = []
    for task in TASKS:
        queues = [[r for r in source if r.task == task] for source in sources]
        interleaved = [r for group in itertools.zip_longest(*queues) for r in group if r is not None]
        by_task.append(interleaved[:limit_per_task])
    return [r for records in by_task for r in records]


def mixed_records(total: int) -> list[Any]:
    """`total` test records taken round-robin over the five tasks (for the end-to-end run)."""
    by_task: dict[str, list[Any]] = {}
    for record in test_records(None):
        by_task.setdefault(record.task, []).append(record)
    mixed = [r for group in itertools.zip_longest(*by_task.values()) for r in group if r is not None]
    if len(mixed) < total:
        raise SystemExit(f"only {len(mixed)} test records (run `python -m data_prep.importers` for more)")
    return mixed[:total]


class Timer:
    """Best (wall, CPU) seconds over repeated calls of one decoder."""

    def __init__(self) -> None:
        self.wall, self.cpu = float("inf"), float("inf")

    def __call__(self, call):
        wall, cpu = time.perf_counter(), time.process_time()
        out = call()
        self.wall = min(self.wall, time.perf_counter() - wall)
        self.cpu = min(self.cpu, time.process_time() - cpu)
        return out


def ours(generator: Any, prompts: list[str], new_tokens: int, batch: int) -> list[tuple[int, ...]]:
    """Token ids per prompt: each prompt alone (batch 1) or all in one call (continuous batching)."""
    if batch == 1:
        completions = [generator.generate([p], max_new_tokens=new_tokens)[0] for p in prompts]
    else:
        completions = generator.generate(prompts, max_new_tokens=new_tokens)
    return [tuple(c.token_ids) for c in completions]


def transformers_generate(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int, batch: int,
                          **options: Any) -> list[tuple[int, ...]]:
    import torch

    eos = tokenizer.eos_id
    outputs: list[tuple[int, ...]] = []
    for start in range(0, len(prompts), batch):
        ids = [tokenizer.encode(t) for t in prompts[start:start + batch]]
        width = max(map(len, ids))
        inputs = torch.tensor([[eos] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with torch.no_grad():
            out = model.generate(inputs, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=eos, eos_token_id=eos, **options)
        for row in out[:, width:].tolist():
            outputs.append(tuple(row[:row.index(eos) + 1] if eos in row else row))
    return outputs


def run(limit_per_task: int | None = None, new_tokens: int = 64, batch_sizes: tuple[int, ...] = (1, 16),
        ks: tuple[int, ...] = (1, 4), repeats: int = 2) -> dict:
    import dataclasses

    import torch
    import transformers

    from llama_e_jax.data.prompt import build_prompt
    from llama_e_jax.generate import speculative
    from llama_e_jax.generate.generator import Generator
    from llama_e_jax.io.default_model import ensure_default_hf_dir
    from llama_e_jax.io.load import load_model

    records = test_records(limit_per_task)
    prompts = [build_prompt(r.instruction, r.input) for r in records]
    hf_dir = ensure_default_hf_dir()
    loaded = load_model(None, dtype="float32")  # the embedded default SmolLM2-135M-Instruct
    config, params, tokenizer = loaded.config, loaded.params, loaded.tokenizer
    settings = {"plain": speculative.OFF}
    settings.update({f"k={k}": dataclasses.replace(speculative.PROMPT_LOOKUP, num_draft=k, max_rows=16) for k in ks})
    generators = {name: Generator(config, params, tokenizer, max_batch_size=16, chunk_size=new_tokens,
                                  speculation=spec) for name, spec in settings.items()}
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch.set_num_threads(1)  # faster than 2 on a shared 2-core machine (bench/decode_cpu.py's probe)

    result: dict[str, Any] = {"model": "SmolLM2-135M-Instruct fp32", "new_tokens": new_tokens,
                              "prompts": len(prompts), "tasks": sorted({r.task for r in records}),
                              "speculation": {name: repr(spec) for name, spec in settings.items()},
                              "hf_prompt_lookup_num_tokens": HF_PROMPT_LOOKUP, "torch_threads": 1,
                              "repeats": repeats, "load_average_before": os.getloadavg()}
    for batch in batch_sizes:
        decoders = {f"ours {name}": (lambda g=g: ours(g, prompts, new_tokens, batch)) for name, g in generators.items()}
        decoders["HF generate"] = lambda: transformers_generate(hf_model, tokenizer, prompts, new_tokens, batch)
        if batch == 1:
            decoders["HF prompt lookup"] = lambda: transformers_generate(
                hf_model, tokenizer, prompts, new_tokens, 1, prompt_lookup_num_tokens=HF_PROMPT_LOOKUP)
        outputs = {name: call() for name, call in decoders.items()}  # compiles ours, warms transformers
        timers = {name: Timer() for name in decoders}
        for _ in range(repeats):
            for name, call in decoders.items():
                outputs[name] = timers[name](call)
        plain = outputs["ours plain"]
        for name in settings:
            assert outputs[f"ours {name}"] == plain, f"speculative {name} output differs from plain greedy"
        tokens = sum(map(len, plain))
        result[f"batch_{batch}"] = {
            "tokens": tokens,
            "decoders": {name: {"wall_s": t.wall, "cpu_s": t.cpu, "tokens_per_s": tokens / t.wall,
                                "tokens_per_cpu_s": tokens / t.cpu,
                                "rows_differing_from_ours": sum(a != b for a, b in zip(outputs[name], plain))}
                         for name, t in timers.items()}}
    result["acceptance_length"] = {name: acceptance_by_task(generators[name], records, prompts, plain, spec)
                                   for name, spec in settings.items() if spec.enabled}
    result["load_average_after"] = os.getloadavg()
    return result


def acceptance_by_task(generator: Any, records: list[Any], prompts: list[str], outputs: list[tuple[int, ...]],
                       speculation: Any) -> dict[str, float]:
    """Mean tokens per verify step, per task (host replay of the greedy outputs)."""
    from llama_e_jax.generate import speculative

    emitted: dict[str, list[int]] = {}
    for record, prompt, output in zip(records, prompts, outputs):
        steps = speculative.acceptance_lengths(generator.encode_prompt(prompt), list(output), speculation)
        emitted.setdefault(record.task, []).extend(steps)
    return {task: sum(steps) / len(steps) for task, steps in emitted.items()}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Greedy, {result['model']}, {result['prompts']} test-split prompts ({', '.join(result['tasks'])}), up to "
             f"{result['new_tokens']} new tokens (EOS stops); transformers prompt_lookup_num_tokens="
             f"{result['hf_prompt_lookup_num_tokens']}, torch threads {result['torch_threads']}; best of "
             f"{result['repeats']} alternating rounds; load average {result['load_average_before'][0]:.1f} before, "
             f"{result['load_average_after'][0]:.1f} after.", "",
             "| batch | decoder | tok/s (wall) | tok/s (CPU time) | vs HF generate (wall / CPU) "
             "| vs HF prompt lookup (wall / CPU) | rows differing from ours |", "|---:|---|---:|---:|---:|---:|---:|"]
    for key, entry in result.items():
        if not key.startswith("batch_"):
            continue
        decoders = entry["decoders"]
        hf, lookup = decoders["HF generate"], decoders.get("HF prompt lookup")
        for name, d in decoders.items():
            vs_lookup = (f"{lookup['wall_s'] / d['wall_s']:.2f}x / {lookup['cpu_s'] / d['cpu_s']:.2f}x"
                         if lookup else "n/a (batch 1 only)")
            lines.append(f"| {key[6:]} | {name} | {d['tokens_per_s']:.1f} | {d['tokens_per_cpu_s']:.1f} | "
                         f"{hf['wall_s'] / d['wall_s']:.2f}x / {hf['cpu_s'] / d['cpu_s']:.2f}x | {vs_lookup} | "
                         f"{d['rows_differing_from_ours']} |")
    for name, by_task in result["acceptance_length"].items():
        lines += ["", f"Acceptance length, {name} (tokens per verify step): " + ", ".join(
            f"{task} {value:.2f}" for task, value in by_task.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit-per-task", type=int, default=6, help="first N test records of each task")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--ks", default="1,4", help="draft counts to measure, comma-separated")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the raw result here")
    args = parser.parse_args(argv)
    result = run(args.limit_per_task, args.new_tokens, tuple(int(b) for b in args.batch_sizes.split(",")),
                 tuple(int(k) for k in args.ks.split(",")), args.repeats)
    return report(result, markdown(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
