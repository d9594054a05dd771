"""Lean decode weights on this CPU: quality and speed of float32 / bfloat16 / int8 kernels, one run.

    python bench/quant_quality.py                       # markdown table
    python bench/quant_quality.py --limit-per-task 20 --new-tokens 32

For each storage mode of the frozen projection kernels (model/quant.py) on SmolLM2-135M-Instruct
(the embedded default model; compute stays fp32):

* reference perplexity on the real test split (seed test split + imported test files, each task's
  first `limit_per_task` records): the project's own teacher-forced scoring (`scoring.reference_nll`,
  response tokens only, exactly the training loss), per task and over all records;
* greedy decoding of the same prompts (batch 16, up to `new_tokens`, EOS stops): rows whose tokens
  equal fp32's, and the mean fraction of each fp32 output reproduced before the first difference;
* decode tokens/s at batch 1 (the first 5 prompts) and batch 16 (all), compilation excluded (each
  call runs twice, the second is timed), speculation off, the modes alternated within one process;
* bytes of all params (projection kernels + scales + embeddings + norms).

The 1-minute load average is recorded before and after: on a shared machine only the ratios between
modes of this one run mean something.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.decode_cpu import REPO_ROOT, report  # noqa: E402,F401 (its import sets XLA_FLAGS for XNNPACK before JAX starts)
from bench.decode_speculative import test_records  # noqa: E402


def perplexities(config: Any, params: dict, tokenizer: Any, records: list[Any], window: int,
                 row_nll: Any) -> dict[str, float]:
    """Per-task and overall reference perplexity (exp of the mean NLL per response token)."""
    import math

    from llama_e_jax import scoring

    nlls = scoring.reference_nll(config, params, tokenizer, records, window, row_nll)
    totals: dict[str, list[float]] = {}
    for record, result in zip(records, nlls):
        if result.nll is None:
            continue
        for key in (record.task, "all"):
            entry = totals.setdefault(key, [0.0, 0])
            entry[0] += result.nll
            entry[1] += result.tokens
    return {key: math.exp(nll / tokens) for key, (nll, tokens) in totals.items()}


def timed_generate(generator: Any, prompts: list[str], new_tokens: int, batch: int) -> tuple[float, list[tuple]]:
    def run():
        if batch == 1:
            return [generator.generate([p], max_new_tokens=new_tokens)[0] for p in prompts]
        return generator.generate(prompts, max_new_tokens=new_tokens)

    run()
    started = time.perf_counter()
    completions = run()
    return time.perf_counter() - started, [tuple(c.token_ids) for c in completions]


def agreement(outputs: list[tuple], reference: list[tuple]) -> tuple[float, float]:
    """(fraction of identical rows, mean fraction of each reference row matched before the first difference)."""
    same = sum(a == b for a, b in zip(outputs, reference)) / len(reference)
    prefixes = []
    for a, b in zip(outputs, reference):
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(common / max(len(b), 1))
    return same, sum(prefixes) / len(prefixes)


def run(limit_per_task: int, new_tokens: int, modes: tuple[str, ...]) -> dict[str, Any]:
    import jax

    from llama_e_jax import scoring
    from llama_e_jax.data.prompt import build_prompt
    from llama_e_jax.generate import speculative
    from llama_e_jax.generate.generator import Generator
    from llama_e_jax.io.load import load_model
    from llama_e_jax.model import quant

    records = test_records(limit_per_task)
    prompts = [build_prompt(r.instruction, r.input) for r in records]
    loaded = load_model(None, dtype="float32")
    config, tokenizer = loaded.config, loaded.tokenizer
    base = jax.tree.map(jax.numpy.asarray, loaded.params)
    window = scoring.perplexity_window(tokenizer, records, config.max_position_embeddings)
    row_nll = scoring.row_nll_function(config)
    result: dict[str, Any] = {"model": "SmolLM2-135M-Instruct (compute fp32)", "records": len(records),
                              "new_tokens": new_tokens, "load_average_before": os.getloadavg(), "modes": {}}
    generators = {}
    for mode in modes:
        params = quant.quantize_params(base, mode)
        entry = result["modes"][mode] = {"weight_bytes": quant.weight_bytes(params)}
        entry["perplexity"] = perplexities(config, params, tokenizer, records, window, row_nll)
        generators[mode] = Generator(config, params, tokenizer, max_batch_size=16, chunk_size=new_tokens,
                                     speculation=speculative.OFF)
    outputs: dict[str, list[tuple]] = {}
    for batch, batch_prompts in ((16, prompts), (1, prompts[:5])):
        for mode in modes:  # alternated: the modes see the same machine load
            seconds, ids = timed_generate(generators[mode], batch_prompts, new_tokens, batch)
            result["modes"][mode][f"batch_{batch}_tokens_per_s"] = sum(map(len, ids)) / seconds
            if batch == 16:
                outputs[mode] = ids
    for mode in modes:
        same, prefix = agreement(outputs[mode], outputs[modes[0]])
        result["modes"][mode].update(rows_identical=same, prefix_agreement=prefix)
    result["load_average_after"] = os.getloadavg()
    return result


def markdown(result: dict[str, Any]) -> str:
    modes = result["modes"]
    reference = next(iter(modes.values()))
    tasks = list(reference["perplexity"])
    lines = [f"{result['model']}, {result['records']} test-split records, greedy up to {result['new_tokens']} new "
             f"tokens; load average {result['load_average_before'][0]:.1f} before, "
             f"{result['load_average_after'][0]:.1f} after.", "",
             "| weights | MB | perplexity (all) | vs first | " + " | ".join(f"ppl {t}" for t in tasks if t != "all")
             + " | rows = first's greedy | prefix agreement | tok/s b1 | tok/s b16 | b1 vs first | b16 vs first |",
             "|---|---:|---:|---:|" + "---:|" * (len(tasks) - 1) + "---:|---:|---:|---:|---:|---:|"]
    for mode, entry in modes.items():
        ppl = entry["perplexity"]
        lines.append(
            f"| {mode} | {entry['weight_bytes'] / 1e6:.0f} | {ppl['all']:.3f} | "
            f"{ppl['all'] / reference['perplexity']['all']:.4f}x | "
            + " | ".join(f"{ppl[t]:.3f}" for t in tasks if t != "all")
            + f" | {entry['rows_identical']:.0%} | {entry['prefix_agreement']:.0%} | "
              f"{entry['batch_1_tokens_per_s']:.1f} | {entry['batch_16_tokens_per_s']:.1f} | "
              f"{entry['batch_1_tokens_per_s'] / reference['batch_1_tokens_per_s']:.2f}x | "
              f"{entry['batch_16_tokens_per_s'] / reference['batch_16_tokens_per_s']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit-per-task", type=int, default=24, help="first N test records of each task")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--modes", default="float32,bfloat16,int8")
    parser.add_argument("--json", help="also write the raw result here")
    args = parser.parse_args(argv)
    result = run(args.limit_per_task, args.new_tokens, tuple(args.modes.split(",")))
    return report(result, markdown(result), args.json)


if __name__ == "__main__":
    sys.exit(main())
