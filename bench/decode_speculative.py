"""Speculative (prompt-lookup) decoding on this CPU, on real prompts, next to transformers in one run.

    python bench/decode_speculative.py                      # markdown table
    python bench/decode_speculative.py --limit-per-task 2 --new-tokens 32

Workload: SmolLM2-135M-Instruct fp32 (the embedded default model), the seed test split's records of
all five tasks (data_prep/seeds through llama_e_jax.data's split assignment), Alpaca prompts, greedy,
up to `new_tokens` per row, stopping at EOS on every side. Four decoders:

* ours, plain: `Generator(speculation=speculative.OFF)`;
* ours, speculative: `Generator(speculation=speculative.PROMPT_LOOKUP)` (prompt-lookup drafts);
* transformers `generate` (greedy);
* transformers `generate(prompt_lookup_num_tokens=K)` (its own prompt-lookup speculation; transformers
  supports it at batch 1 only, so it has no batch-16 figure).

Batch 1: each prompt alone, tokens/s = generated tokens / total wall time. Batch 16: all test prompts
in one `generate` call (ours: continuous batching over 16 rows; transformers: left-padded groups of
16, its tokens counted up to each row's EOS). Compilation is excluded (ours runs every call twice and
times the second). Outputs: the speculative tokens must equal plain greedy's (asserted), and the
rows where transformers' text differs (floating-point ties) are counted. Acceptance length per task
= tokens emitted per verify step, replayed on the host from the greedy output
(`speculative.acceptance_lengths`, exact for greedy decoding). The 1-minute load average is
recorded: on a shared machine, only ratios from the same run mean something.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.decode_cpu import REPO_ROOT  # noqa: E402 (its import sets XLA_FLAGS for XNNPACK before JAX starts)

HF_PROMPT_LOOKUP = 10  # transformers' documented example value for prompt_lookup_num_tokens


def test_records(limit_per_task: int | None) -> list[Any]:
    from llama_e_jax.data.schema import TASKS, read_jsonl
    from llama_e_jax.data.tfds_builder import assign_splits

    files = sorted(glob.glob(str(Path(REPO_ROOT) / "data_prep" / "seeds" / "*.jsonl")))
    test = assign_splits([r for f in files for r in read_jsonl(f)])["test"]
    by_task = [[r for r in test if r.task == task][:limit_per_task] for task in TASKS]
    return [r for records in by_task for r in records]


def _timed(call) -> tuple[float, Any]:
    started = time.perf_counter()
    out = call()
    return time.perf_counter() - started, out


def ours(generator: Any, prompts: list[str], new_tokens: int, batch: int) -> tuple[float, list[tuple[int, ...]]]:
    """Seconds (second of two identical runs) and token ids per prompt."""
    def run():
        if batch == 1:
            return [generator.generate([p], max_new_tokens=new_tokens)[0] for p in prompts]
        return generator.generate(prompts, max_new_tokens=new_tokens)

    run()
    seconds, completions = _timed(run)
    return seconds, [tuple(c.token_ids) for c in completions]


def transformers_generate(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int, batch: int,
                          **options: Any) -> tuple[float, list[tuple[int, ...]]]:
    import torch

    eos = tokenizer.eos_id
    outputs: list[tuple[int, ...]] = []
    seconds = 0.0
    for start in range(0, len(prompts), batch):
        ids = [tokenizer.encode(t) for t in prompts[start:start + batch]]
        width = max(map(len, ids))
        inputs = torch.tensor([[eos] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with torch.no_grad():
            elapsed, out = _timed(lambda: model.generate(inputs, attention_mask=mask, max_new_tokens=new_tokens,
                                                         do_sample=False, pad_token_id=eos, eos_token_id=eos,
                                                         **options))
        seconds += elapsed
        for row in out[:, width:].tolist():
            outputs.append(tuple(row[:row.index(eos) + 1] if eos in row else row))
    return seconds, outputs


def run(limit_per_task: int | None = None, new_tokens: int = 64, batch_sizes: tuple[int, ...] = (1, 16)) -> dict:
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
    plain = Generator(config, params, tokenizer, max_batch_size=16, chunk_size=new_tokens,
                      speculation=speculative.OFF)
    fast = Generator(config, params, tokenizer, max_batch_size=16, chunk_size=new_tokens,
                     speculation=speculative.PROMPT_LOOKUP)
    hf_model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch.set_num_threads(1)  # faster than 2 on a shared 2-core machine (bench/decode_cpu.py's probe)
    hf_model.generate(torch.tensor([tokenizer.encode(prompts[0])]), max_new_tokens=2, do_sample=False)  # warm-up

    result: dict[str, Any] = {"model": "SmolLM2-135M-Instruct fp32", "new_tokens": new_tokens,
                              "prompts": len(prompts), "speculation": repr(speculative.PROMPT_LOOKUP),
                              "hf_prompt_lookup_num_tokens": HF_PROMPT_LOOKUP, "torch_threads": 1,
                              "load_average_before": os.getloadavg(), "rows": []}
    for batch in batch_sizes:
        entry: dict[str, Any] = {}
        plain_s, plain_ids = ours(plain, prompts, new_tokens, batch)
        fast_s, fast_ids = ours(fast, prompts, new_tokens, batch)
        assert fast_ids == plain_ids, "speculative output differs from plain greedy"
        hf_s, hf_ids = transformers_generate(hf_model, tokenizer, prompts, new_tokens, batch)
        tokens = sum(map(len, plain_ids))
        entry.update(tokens=tokens, ours_plain_s=plain_s, ours_speculative_s=fast_s, hf_s=hf_s,
                     hf_rows_differing=sum(a != b for a, b in zip(hf_ids, plain_ids)))
        if batch == 1:
            lookup_s, lookup_ids = transformers_generate(hf_model, tokenizer, prompts, new_tokens, 1,
                                                         prompt_lookup_num_tokens=HF_PROMPT_LOOKUP)
            entry.update(hf_prompt_lookup_s=lookup_s,
                         hf_prompt_lookup_rows_differing=sum(a != b for a, b in zip(lookup_ids, plain_ids)))
        result[f"batch_{batch}"] = entry
        for name, seconds in (("ours speculative", fast_s), ("ours plain", plain_s)):
            result["rows"].append({"metric": f"decode tokens/s, batch {batch}, {name} vs HF generate",
                                   "ours": tokens / seconds, "alternative": tokens / hf_s, "ratio": hf_s / seconds})
        if batch == 1:
            result["rows"].append({"metric": "decode tokens/s, batch 1, ours speculative vs HF prompt lookup",
                                   "ours": tokens / fast_s, "alternative": tokens / entry["hf_prompt_lookup_s"],
                                   "ratio": entry["hf_prompt_lookup_s"] / fast_s})
    result["acceptance_length"] = acceptance_by_task(fast, records, prompts, plain_ids, speculative.PROMPT_LOOKUP)
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
    lines = [f"Greedy, {result['model']}, {result['prompts']} seed test-split prompts (all five tasks), up to "
             f"{result['new_tokens']} new tokens (EOS stops), {result['speculation']}, transformers "
             f"prompt_lookup_num_tokens={result['hf_prompt_lookup_num_tokens']}, torch threads "
             f"{result['torch_threads']}; load average {result['load_average_before'][0]:.1f} before, "
             f"{result['load_average_after'][0]:.1f} after.", "",
             "| batch | ours speculative tok/s | ours plain tok/s | HF generate tok/s | HF prompt lookup tok/s "
             "| spec. vs HF | spec. vs HF lookup | HF rows differing |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for key, entry in result.items():
        if not key.startswith("batch_"):
            continue
        tokens = entry["tokens"]
        lookup = entry.get("hf_prompt_lookup_s")
        lookup_tps = f"{tokens / lookup:.1f}" if lookup else "n/a (batch 1 only)"
        lookup_ratio = f"{lookup / entry['ours_speculative_s']:.2f}x" if lookup else "-"
        differing = f"{entry['hf_rows_differing']}" + (
            f" / lookup {entry['hf_prompt_lookup_rows_differing']}" if lookup else "")
        lines.append(
            f"| {key[6:]} | {tokens / entry['ours_speculative_s']:.1f} | {tokens / entry['ours_plain_s']:.1f} "
            f"| {tokens / entry['hf_s']:.1f} | {lookup_tps} | {entry['hf_s'] / entry['ours_speculative_s']:.2f}x "
            f"| {lookup_ratio} | {differing} |")
    lines += ["", "Acceptance length (tokens per verify step): " + ", ".join(
        f"{task} {value:.2f}" for task, value in result["acceptance_length"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit-per-task", type=int, default=None, help="first N test records of each task")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,16")
    args = parser.parse_args(argv)
    result = run(args.limit_per_task, args.new_tokens, tuple(int(b) for b in args.batch_sizes.split(",")))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
